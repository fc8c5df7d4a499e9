"""Fine-tune a semantic-segmentation model (UperNet on a Swin backbone) with Mona, LoRA or full fine-tuning.

    python scripts/train_segmentation.py              # Mona, random small Swin + generated scenes, all offline
    python scripts/train_segmentation.py --output_dir D --max_steps 2
    python scripts/train_segmentation.py --model_name_or_path microsoft/swin-tiny-patch4-window7-224 \
        --dataset_name scene_parse_150 --label_column_name annotation --reduce_labels --image_size 256

Every transformers TrainingArguments flag works; see `--help` and docs/segmentation.md. The logic lives in
mona_peft.training: the pipeline of every task (run.py) with the segmentation task (segmentation/).
"""

import sys

from mona_peft.training import DataError, ModelError, OutputDirError
from mona_peft.training.segmentation import main

if __name__ == "__main__":
    try:
        main()
    except (DataError, ModelError, OutputDirError) as exc:
        sys.exit(f"error: {exc}")
