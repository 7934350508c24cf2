"""Fine-tuning entry points (LoRA fine-tuning lands here: `python -m train.finetune`)."""
