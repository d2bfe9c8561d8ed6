"""The data stages on Ray (prepare, embed, cluster, source): how each runs (`stages.DATA_STAGES`), on Ray Data or in
the job's one data worker, and the code that runs them."""
