"""Research tools apart from the product: the paper's protocol and tables (:mod:`.reproduce`,
:mod:`.paper_results`), synthetic cohorts (:mod:`.synthetic`), the demo (:mod:`.demo`) and the stitch preview
(:mod:`.preview`)."""
