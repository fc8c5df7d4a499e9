"""The offline ``mean_iou`` metric module (load it with ``evaluate.load`` on this folder, not by importing it)."""
