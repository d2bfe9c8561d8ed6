"""The job store: its tables, every read and write of them (`Store`), and users with their tokens and budgets."""
