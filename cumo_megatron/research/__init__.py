"""Research tools: scaling-law sweeps and fits, expert-load analysis, ablations in miniature."""
