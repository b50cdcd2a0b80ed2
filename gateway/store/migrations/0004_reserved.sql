-- Reserved for the callbacks branch's migration 0004 (SQLite's 9th entry): at the merge,
-- theirs replaces this placeholder (the files must be numbered without gaps).
SELECT 1;
