"""Fine-tune an object detector (Deformable DETR on a DINOv2 or Swin backbone) with Mona, LoRA or full fine-tuning.

    python scripts/train_detection.py              # Mona, offline DINOv2-small + generated scenes, all offline
    python scripts/train_detection.py --output_dir D --max_steps 2
    python scripts/train_detection.py --dataset_name cppe-5 --image_size 448
    python scripts/train_detection.py --train_dir coco/train --validation_dir coco/val   # annotations.json + images

Every transformers TrainingArguments flag works; see `--help` and docs/detection.md. The logic lives in
mona_peft.training: the pipeline of every task (run.py) with the detection task (detection/).
"""

import sys

from mona_peft.training import DataError, ModelError, OutputDirError
from mona_peft.training.detection import main

if __name__ == "__main__":
    try:
        main()
    except (DataError, ModelError, OutputDirError) as exc:
        sys.exit(f"error: {exc}")
