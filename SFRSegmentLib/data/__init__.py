"""Cohorts and the arrays made from them: cohort discovery in four layouts, image and label checks, resampling to a
working grid, intensity scaling, patches and augmentation."""
