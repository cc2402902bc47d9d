"""DVC stage entry points: one thin script per stage of dvc.yaml, built on stages/common.py."""
