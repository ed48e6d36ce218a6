"""Gates, Pareto front and champion; the report (summary table, Pareto plot, sensitivity tables)."""
