#!/usr/bin/env bash
# Make a private CA and a SuperLink TLS certificate signed by it.
#
#   scripts/make_certs.sh OUT_DIR [HOST_OR_IP ...]
#
# Writes OUT_DIR/ca.crt, ca.key, server.pem, server.key. The server certificate is valid for
# localhost, 127.0.0.1 and every extra HOST_OR_IP given (the names/addresses SuperNodes and `flwr`
# use to reach the SuperLink). Give ca.crt to every SuperNode (--root-certificates) and to the
# `flwr` CLI (root-certificates in ~/.flwr/config.toml); keep ca.key and server.key secret.
set -euo pipefail
out="${1:?usage: make_certs.sh OUT_DIR [HOST_OR_IP ...]}"
shift
mkdir -p "$out"
cd "$out"

san="DNS:localhost,IP:127.0.0.1"
for h in "$@"; do
  if [[ "$h" =~ ^[0-9.]+$ || "$h" == *:* ]]; then san="$san,IP:$h"; else san="$san,DNS:$h"; fi
done

openssl genrsa -out ca.key 4096 2>/dev/null
openssl req -new -x509 -key ca.key -sha256 -days 365 -subj "/O=fedpers/CN=fedpers-ca" -out ca.crt
openssl genrsa -out server.key 4096 2>/dev/null
openssl req -new -key server.key -subj "/O=fedpers/CN=fedpers-superlink" -out server.csr
printf 'subjectAltName=%s\nbasicConstraints=CA:FALSE\nkeyUsage=digitalSignature,keyEncipherment\nextendedKeyUsage=serverAuth\n' \
  "$san" > server.ext
openssl x509 -req -in server.csr -CA ca.crt -CAkey ca.key -CAcreateserial -days 365 -sha256 \
  -extfile server.ext -out server.pem 2>/dev/null
rm -f server.csr server.ext ca.srl
chmod 600 ca.key server.key
echo "wrote $out/{ca.crt,ca.key,server.pem,server.key} for $san"
