"""fsad: few-shot anomaly detection on OpenCLIP with Lightning."""
