"""shrink: compile a large language model into a small, task-specific one."""

__version__ = "0.1.0"
