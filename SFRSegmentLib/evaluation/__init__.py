"""Scoring and reporting: Dice, Jaccard, 95HD and ASD of predictions against labels (:mod:`.metrics`) and the run's
HTML report (:mod:`.report`)."""
