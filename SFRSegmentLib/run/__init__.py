"""A whole run: the plan derived from the cohort (:mod:`.plan`), the stages of a run behind one interface
(:mod:`.stages`), the time estimate (:mod:`.estimate`), the pipeline over the stages in a run folder
(:mod:`.pipeline`) and the update of a finished run with corrected labels (:mod:`.update`)."""
