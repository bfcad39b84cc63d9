module dialloop

go 1.19
