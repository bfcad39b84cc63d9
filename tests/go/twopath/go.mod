module twopath

go 1.19
