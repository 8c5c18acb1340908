"""Federated DoRA fine-tuning of medical LLMs on Flower's deployment runtime."""
