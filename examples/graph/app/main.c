#include <stdio.h>
#include <string.h>
#include "greet.h"

int main(int argc, char **argv)
{
    char line[256];
    if (argc > 1) {
        greet(argv[1]);
        return 0;
    }
    while (fgets(line, sizeof line, stdin)) {
        line[strcspn(line, "\n")] = 0;
        if (*line)
            greet(line);
    }
    return 0;
}
