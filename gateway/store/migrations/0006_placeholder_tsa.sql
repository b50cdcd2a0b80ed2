-- A placeholder for another branch's 0006 (tsa's 0007 keeps its number until the merge
-- puts the real 0006 here: the lead drops this file).
SELECT 1;
