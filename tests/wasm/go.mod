module bacqwasmtests

go 1.21
