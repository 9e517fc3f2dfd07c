"""Flower integration: ServerApp/ClientApp (apps.py) and the simulation-engine launcher."""
