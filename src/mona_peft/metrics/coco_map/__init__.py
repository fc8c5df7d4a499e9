"""The offline ``coco_map`` metric module (load it with ``evaluate.load`` on this folder, not by importing it)."""
