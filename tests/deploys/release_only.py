"""Only the release step of deploy.py, for tests/unit/test_release_task.py."""

from tasks.release import build_release

build_release()
