// spin computes forever: only its fuel budget (or the timeout) stops it.
package main

import "fmt"

func main() {
	x := uint64(1)
	for i := uint64(0); ; i++ {
		x = x*6364136223846793005 + i
		if x == 0 {
			fmt.Println(x)
		}
	}
}
