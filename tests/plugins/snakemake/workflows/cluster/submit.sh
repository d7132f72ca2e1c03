#!/bin/bash
# A local "cluster" for cluster-generic: run the job script (the last argument) in the background, print a job id.
jobscript="${@: -1}"
id="job$$-$RANDOM"
mkdir -p cluster_logs
nohup bash "$jobscript" > "cluster_logs/$id.out" 2>&1 < /dev/null &
echo "$id"
