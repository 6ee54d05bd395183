"""melayer's lm-eval task configs: ``lm_eval --include_path <this folder> --metadata '{"data_dir": ...}'``."""
from pathlib import Path

TASKS_DIR = Path(__file__).resolve().parent
