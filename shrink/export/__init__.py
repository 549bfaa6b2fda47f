"""Exporting a student to deployment formats."""
