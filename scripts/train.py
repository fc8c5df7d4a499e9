"""Fine-tune an image classifier with Mona (or LoRA, full fine-tuning, a linear probe) using transformers' Trainer.

    python scripts/train.py                          # Mona on the offline DINOv2-small + the embedded textile images
    python scripts/train.py --output_dir D --max_steps 4 --per_device_train_batch_size 4
    python scripts/train.py --method lora --model_name_or_path google/vit-base-patch16-224-in21k --dataset_name beans
    accelerate launch --multi_gpu --num_processes 2 scripts/train.py --output_dir D   # 2 processes (gloo on CPUs)

Every transformers TrainingArguments flag works; see `--help` and docs/training.md. The logic lives in
mona_peft.training (run.py, the pipeline of every task; classification.py, data.py, recipe.py).
"""

import sys

from mona_peft.training import DataError, ModelError, OutputDirError, main

if __name__ == "__main__":
    try:
        main()
    except (DataError, ModelError, OutputDirError) as exc:
        sys.exit(f"error: {exc}")
