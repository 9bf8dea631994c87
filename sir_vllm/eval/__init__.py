"""The paper's tasks (DailyDialog, Grocery Shopping, Rock-Paper-Scissors) and
long-stream perplexity, run against the oracle or a live server."""
