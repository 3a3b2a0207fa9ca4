"""Operations on a finished run, one module each behind its command: evaluate it, score with
a reward model, export, quantize, factor its kernels (low rank)."""
