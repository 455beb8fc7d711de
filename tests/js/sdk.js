// What the AWS SDK for JavaScript v3 makes of a session, the way a program would see it:
//   node sdk.js whoami [PROFILE]   the ARN STS GetCallerIdentity answers
//   node sdk.js region [PROFILE]   the region a client resolves
// Credentials, region and endpoint come from the SDK's own chains (environment, the shared files
// with credential_process, the container endpoint, IMDS; AWS_ENDPOINT_URL_STS); no PROFILE, or
// "default", leaves the choice to AWS_PROFILE and the chain. A failure prints "ERROR name: message".
const { STSClient, GetCallerIdentityCommand } = require("@aws-sdk/client-sts");

const [what, profile] = process.argv.slice(2);
const client = new STSClient(profile && profile !== "default" ? { profile } : {});

async function main() {
  if (what === "whoami") return (await client.send(new GetCallerIdentityCommand({}))).Arn;
  if (what === "region") return client.config.region();
  throw new Error(`usage: node sdk.js whoami|region [PROFILE], not ${what}`);
}

main().then(
  (answer) => console.log(answer),
  (err) => {
    console.log(`ERROR ${err.name}: ${err.message}`);
    process.exitCode = 1;
  },
);
