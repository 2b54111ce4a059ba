"""Tools that are not stages: check, plan, schedule, sweep, lr-find, generate, export."""
