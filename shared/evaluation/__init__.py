"""Next-basket evaluation of purchase logs: tasks at a date cut, ranking metrics, and the classic baselines."""
