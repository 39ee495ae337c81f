"""What the user reads: tables, reports of plans and searches, comparisons and Gantt charts."""
