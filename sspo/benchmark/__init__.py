"""``sspo bench``'s parts: the arms and their configs, measuring one arm, memory, FLOPs, the report."""
