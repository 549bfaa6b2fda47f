"""Logit distillation of a task-specific student from a teacher."""
