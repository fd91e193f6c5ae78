"""Pod power: budgets (site, fleet, grid import), per-GPU allocation, grid-friendly ramps (battery)."""
