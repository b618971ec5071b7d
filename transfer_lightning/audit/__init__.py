"""``audit``: what is wrong with a data set before training on it: likely wrong labels, duplicates and leaks
across splits, and outliers, found on a pretrained backbone's frozen features."""
