"""MAIRA-2 (microsoft/maira-2) for today's transformers: model, processor, and a tiny checkpoint in
its on-disk layout for tests and the offline demo. See modeling.py for why the port exists."""
