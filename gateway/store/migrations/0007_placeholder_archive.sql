-- Placeholder for another branch's migration 7 (archive branch): the lead drops it at merge.
SELECT 1;
