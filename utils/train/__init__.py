"""Training: the model a run trains, the loop over epochs and steps, the guard against
non-finite steps, the recipe's parts (optimizer, schedule, EMA, mixup) and reproducible
randomness."""
