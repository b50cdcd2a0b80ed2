-- Placeholder for another branch's migration 6 (archive branch): the lead drops it at merge.
SELECT 1;
