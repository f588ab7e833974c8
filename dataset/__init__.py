"""Records, media and prompts: everything between a jsonl file and a model batch."""
