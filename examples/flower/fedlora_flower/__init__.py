"""Federated LoRA fine-tuning with Flower and fedlora (ServerApp + ClientApp example)."""
