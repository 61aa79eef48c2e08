"""Accuracy probes shared by training, model cards and the KV-cache method comparisons."""
