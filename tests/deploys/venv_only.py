"""Only the venv step of deploy.py, for tests/unit/test_venv_task.py."""

from tasks.venv import create_venv

create_venv()
