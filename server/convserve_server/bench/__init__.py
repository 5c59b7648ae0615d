"""``convserve-bench``: closed-loop load against a server, beside the ceilings it is judged by."""
