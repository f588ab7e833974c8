"""Scoring Lynx answers: Open-VQA rules, an LLM judge, human marks and MME. Independent of torch.

Bad input (a file, a line, a flag) raises errors.InputError, which the CLI prints in one line (exit 1).
"""
