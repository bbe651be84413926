"""Fine-tuning: the recipe, the objective and loop, distributed helpers, the launcher, the compile guard."""
