"""The FineViT trainers: stage1.py (image-text pretraining), config, FSDP2 parallelization, checkpoints, metrics."""
