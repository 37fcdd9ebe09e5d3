"""`mona-dist bench`: what each tuning method costs to train, measured side by side in one run."""
